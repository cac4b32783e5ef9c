//! `email.test_transport`'s connection check, with no pgrx: blocking std I/O with short
//! timeouts, run in the caller's backend (a diagnostic an operator calls by hand; it holds no
//! lock). SMTP: connect, read the greeting, EHLO, QUIT. HTTP APIs: a TCP connection to the
//! endpoint. Nothing is sent and no secret is used; replies are cut short and never echo one.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::dsn::{Dsn, Kind, Tls};

/// Longest wait for any one step.
const MAX_WAIT: Duration = Duration::from_secs(10);

/// Connects as the transport would, without sending; Ok says what answered.
pub fn connect(d: &Dsn) -> Result<String, String> {
    let wait = d.timeout.min(MAX_WAIT);
    match d.kind {
        Kind::Smtp => {
            let host = d.host.clone().unwrap_or_default();
            let port = d.port.unwrap_or(25);
            let stream = open(&host, port, wait)?;
            if d.tls == Tls::Implicit {
                return Ok(format!("connected to {host}:{port} (the TLS handshake is checked when mail is sent)"));
            }
            smtp_hello(stream, &host, port)
        }
        Kind::Http(p) => {
            let host = d.host.clone().unwrap_or_else(|| p.default_host(&d.options));
            let port = d.port.unwrap_or(if d.http_scheme == "http" { 80 } else { 443 });
            open(&host, port, wait)?;
            Ok(format!("connected to {host}:{port}"))
        }
        Kind::File => Ok(format!("{} is writable", d.path.as_deref().unwrap_or(""))),
        Kind::Capture => Ok("nothing to connect to: capture keeps messages in email.captured".into()),
    }
}

fn open(host: &str, port: u16, wait: Duration) -> Result<TcpStream, String> {
    let addrs: Vec<_> = (host, port).to_socket_addrs().map_err(|e| format!("cannot resolve {host}: {e}"))?.collect();
    let mut last = format!("{host} has no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, wait) {
            Ok(s) => {
                s.set_read_timeout(Some(wait)).ok();
                s.set_write_timeout(Some(wait)).ok();
                return Ok(s);
            }
            Err(e) => last = format!("cannot connect to {host}:{port} ({addr}): {e}"),
        }
    }
    Err(last)
}

/// Reads one SMTP reply (its last line), at most 64 lines of at most 512 bytes.
fn reply(r: &mut BufReader<TcpStream>) -> Result<String, String> {
    for _ in 0..64 {
        let mut line = String::new();
        Read::by_ref(r).take(512).read_line(&mut line).map_err(|e| format!("no answer: {e}"))?;
        if line.is_empty() {
            return Err("the server closed the connection".into());
        }
        let line = line.trim_end().to_string();
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return Ok(line);
        }
    }
    Err("the reply is too long".into())
}

fn smtp_hello(stream: TcpStream, host: &str, port: u16) -> Result<String, String> {
    let mut w = stream.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(stream);
    let greeting = reply(&mut r)?;
    if !greeting.starts_with("220") {
        return Err(format!("{host}:{port} greeted with: {}", cut(&greeting)));
    }
    w.write_all(b"EHLO pg-email-test\r\n").map_err(|e| e.to_string())?;
    let ehlo = reply(&mut r)?;
    let _ = w.write_all(b"QUIT\r\n");
    if !ehlo.starts_with("250") {
        return Err(format!("{host}:{port} refused EHLO: {}", cut(&ehlo)));
    }
    Ok(format!("{host}:{port} greeted with: {}", cut(&greeting)))
}

fn cut(s: &str) -> String {
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn server(script: &'static [&'static str]) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            w.write_all(script[0].as_bytes()).unwrap();
            for answer in &script[1..] {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                w.write_all(answer.as_bytes()).unwrap();
            }
        });
        port
    }

    #[test]
    fn an_smtp_server_is_greeted_and_left() {
        let port = server(&["220 mx.test ESMTP\r\n", "250-mx.test\r\n250 SIZE 1000\r\n", "221 bye\r\n"]);
        let d = crate::deliver::dsn::parse(&format!("smtp://127.0.0.1:{port}?tls=none&timeout=5s")).unwrap();
        assert_eq!(connect(&d).unwrap(), format!("127.0.0.1:{port} greeted with: 220 mx.test ESMTP"));
    }

    #[test]
    fn a_refusing_greeting_and_a_closed_port_are_errors() {
        let port = server(&["554 go away\r\n"]);
        let d = crate::deliver::dsn::parse(&format!("smtp://127.0.0.1:{port}?tls=none&timeout=5s")).unwrap();
        assert_eq!(connect(&d).unwrap_err(), format!("127.0.0.1:{port} greeted with: 554 go away"));
        let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let d = crate::deliver::dsn::parse(&format!("smtp://127.0.0.1:{closed}?tls=none&timeout=5s")).unwrap();
        assert!(connect(&d).unwrap_err().starts_with(&format!("cannot connect to 127.0.0.1:{closed}")));
    }
}

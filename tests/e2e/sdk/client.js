// Drives one official provider SDK against pg_email's listener, for tests/e2e/test_send_api.py.
// Reads one JSON request on stdin:
//   {"sdk": "resend" | "postmark" | "sendgrid" | "nodemailer", "port": 8025, "key": "...",
//    "call": "send" | "batch" | "template" | "template_batch", "message": {...} | [...], "options": {...}}
// and prints one JSON line: {"ok": true, "result": ...} or {"ok": false, "exception", "name",
// "message", "statusCode", "own"} (whatever the SDK raised or returned as its error).
// Nodemailer: "message" is its message object, "options" {"host", "localAddress", "requireTLS", "ignoreTLS",
// "ca": "<pem>", "user", "pass", "method"}.
const sdk = (name) => require(name);

function errorInfo(e) {
  const own = {};
  for (const k of Object.getOwnPropertyNames(e)) {
    if (k === 'stack') continue;
    try { JSON.stringify(e[k]); own[k] = e[k]; } catch { own[k] = String(e[k]); }
  }
  return {
    ok: false, exception: e.constructor && e.constructor.name, name: e.name, message: e.message,
    statusCode: e.statusCode ?? e.code ?? (e.response && e.response.statusCode), own,
  };
}

async function resend(req) {
  const { Resend } = sdk('resend');
  const client = new Resend(req.key, { baseUrl: `http://127.0.0.1:${req.port}` });
  const opts = { ...(req.options || {}), signal: AbortSignal.timeout(30000) };
  // The Resend SDK returns {data, error} instead of throwing.
  const r = req.call === 'batch' ? await client.batch.send(req.message, opts) : await client.emails.send(req.message, opts);
  if (r.error) return { ok: false, exception: 'ResendError', name: r.error.name, message: r.error.message, statusCode: r.error.statusCode, own: r.error };
  return { ok: true, result: r.data };
}

async function postmark(req) {
  const pm = sdk('postmark');
  const client = new pm.ServerClient(req.key, { useHttps: false, requestHost: `127.0.0.1:${req.port}`, timeout: 30 });
  const call = { send: 'sendEmail', batch: 'sendEmailBatch', template: 'sendEmailWithTemplate', template_batch: 'sendEmailBatchWithTemplates' }[req.call];
  return { ok: true, result: await client[call](req.message) };
}

async function sendgrid(req) {
  const sg = sdk('@sendgrid/mail');
  sg.setApiKey(req.key);
  // setApiKey() resets the base URL: set it after.
  sg.client.setDefaultRequest('baseUrl', `http://127.0.0.1:${req.port}/`);
  sg.setTimeout(30000);
  const [response] = await sg.send(req.message, req.call === 'multiple');
  return { ok: true, result: { statusCode: response.statusCode, headers: response.headers, body: response.body } };
}

async function nodemailer(req) {
  const nm = sdk('nodemailer');
  const o = req.options || {};
  const transport = nm.createTransport({
    host: o.host || '127.0.0.1', port: req.port, localAddress: o.localAddress, name: o.name || 'client.test',
    secure: false, requireTLS: !!o.requireTLS, ignoreTLS: !!o.ignoreTLS,
    auth: o.user ? { user: o.user, pass: o.pass, method: o.method } : undefined,
    tls: o.ca ? { ca: o.ca, servername: 'localhost' } : { rejectUnauthorized: false },
    connectionTimeout: 30000, greetingTimeout: 30000, socketTimeout: 60000,
  });
  const info = await transport.sendMail(req.message);
  transport.close();
  return { ok: true, result: { messageId: info.messageId, response: info.response, accepted: info.accepted, rejected: info.rejected, envelope: info.envelope } };
}

async function main() {
  const input = require('fs').readFileSync(0, 'utf8');
  const req = JSON.parse(input);
  const run = { resend, postmark, sendgrid, nodemailer }[req.sdk];
  let out;
  try {
    out = await run(req);
  } catch (e) {
    out = errorInfo(e);
  }
  process.stdout.write(JSON.stringify(out) + '\n');
}

main();

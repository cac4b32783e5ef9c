//! Delivery, with no pgrx: DSN parsing, transports and outcome classification. Everything here
//! runs either in a backend (DSN validation) or on the worker's tokio runtime, on plain values
//! copied out of the database by the worker's main thread.

pub mod dsn;

//! End-to-end tests: each starts a real gateway (own ports, own temp dir) and talks to it the
//! way devices and operators do.

mod bad_input;
mod drift;
mod fleet;
mod hostile;
mod ingest;
mod interop;
mod limits;
mod load;
mod restart;
mod rollouts;
mod updates;
mod validation;

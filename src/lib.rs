//! smsgw: an SMS gateway daemon.
//!
//! The modules follow one message through the gateway:
//! HTTP (`api`) → validation and policy → durable queue (`store`) → `dispatch` → SMPP session
//! (`smpp`) → `receipt` → `webhook`.

pub mod encoding;
pub mod receipt;
pub mod sim;

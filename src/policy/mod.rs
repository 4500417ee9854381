//! Policy decisions of the gateway (DESIGN.md, "Policy rules"): whether a message may go to a
//! number that opted out or changed hands, and how an inbound reply is read as a keyword.
//!
//! Everything here is a pure function of its arguments: no store, no clock, no I/O. The callers
//! (API, dispatcher, inbound handler, CLI) fetch the facts and apply the answer, so the rules can
//! be tested exhaustively and read in one place.

pub mod number_change;
pub mod opt_out;

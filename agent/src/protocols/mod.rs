//! Sans-IO protocol parsers: they are fed captured bytes and never do I/O, log, or panic.
//!
//! Each protocol offers a cheap `sniff` (does this look like the protocol at all?) used to decide
//! whether a connection is worth following, and a full parser used once it is.

pub mod http1;

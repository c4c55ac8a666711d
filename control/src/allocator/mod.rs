//! The allocator: starts service instances on demand. So far its protocol, which proxies use
//! to ask for an instance; the program itself is issue #5.

pub mod protocol;

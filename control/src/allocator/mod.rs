//! The allocator: starts service instances on demand, where proxies ask for them.
//!
//! - [`protocol`]: `/mtc/allocator/start/1`, what proxies send.
//! - [`ports`]: the ports each instance gets, from a range outside the kernel's ephemeral one.
//! - [`book`]: the instances and the decisions about them: reuse, culling (pure).
//! - `runtime`: Docker containers or processes, behind one interface.
//! - `app`: the `allocator` program.

pub mod book;
pub mod ports;
pub use mtc_overlay::allocator::protocol;

#[cfg(feature = "docker")]
pub mod app;
#[cfg(feature = "docker")]
pub mod runtime;

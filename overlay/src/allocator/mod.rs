//! What a proxy needs of allocators: the protocol to ask one for an instance, and the contract
//! with the instances an allocator starts. The allocator itself is `control::allocator`.

pub mod protocol;

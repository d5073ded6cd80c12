//! The ring, fixed buffers, typed operations and a per-core event loop.
//! Knows nothing about HTTP.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

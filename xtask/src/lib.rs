//! Workspace tasks as a library, so tests can run them too.

pub mod images;
pub mod krew;
pub mod ldd;
pub mod node_image;

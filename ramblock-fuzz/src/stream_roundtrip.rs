//! todo
#![allow(missing_docs)]
pub fn fuzz(_: &[u8]) {}

//! KVM memslots and the three KVM dirty-log modes for ramblock blocks.
#![deny(missing_docs)]

//! Linux host memory for ramblock blocks: anonymous, memfd, hugetlb and
//! file-backed memory behind the core's `HostMemory` trait.
#![deny(missing_docs)]

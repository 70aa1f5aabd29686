//! Reference models of ramblock structures and the fuzz targets over them.
#![deny(missing_docs)]

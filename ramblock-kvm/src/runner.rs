//! A vCPU on its own thread (filled in below).

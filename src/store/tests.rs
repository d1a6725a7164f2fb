//! Unit tests for the bitmap store on `MemStorage`.

//! `dbm`: the dirty-bitmap command line.
fn main() {}

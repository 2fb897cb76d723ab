//! Load generator for the admission webhook (filled in by a later commit).

fn main() {}

//! placeholder for helper

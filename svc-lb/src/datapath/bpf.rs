//! The real maps and programs, through aya.

//! Map codec: raw map keys and values, decoded, re-encoded and planned from.
//! The properties live in `svc_lb::fuzzing`, shared with the regression test.
#![no_main]

#[global_allocator]
static ALLOC: svc_lb::fuzzing::CountingAlloc = svc_lb::fuzzing::CountingAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| svc_lb::fuzzing::codec(data));

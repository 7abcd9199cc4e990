//! The `svc-lb.io/weights` annotation (issue 15): parser, slot layouts and the weighted
//! Maglev table's entries per endpoint. The properties live in `svc_lb::fuzzing`.
#![no_main]

#[global_allocator]
static ALLOC: svc_lb::fuzzing::CountingAlloc = svc_lb::fuzzing::CountingAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| svc_lb::fuzzing::weights(data));

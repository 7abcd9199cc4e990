//! LoadBalancer pools, L2Advertisements, Nodes and Services: pool validation, allocation
//! and the choice of announcing node. The properties live in `svc_lb::fuzzing`.
#![no_main]

#[global_allocator]
static ALLOC: svc_lb::fuzzing::CountingAlloc = svc_lb::fuzzing::CountingAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| svc_lb::fuzzing::lbipam(data));

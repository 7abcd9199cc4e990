//! Sources produce Kubernetes objects only. Every source feeds the same model, so the
//! manifest mode and the cluster mode cannot drift apart.
use std::{collections::BTreeMap, path::PathBuf};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use crate::model::ObjectRef;

pub mod kube;
pub mod manifests;

/// A complete, consistent view of the objects a source knows. Sources send whole
/// snapshots, never partial updates, so the model never sees a half-read directory.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    /// This node's Node object, when the source knows it (the Kubernetes source).
    pub node: Option<Node>,
    /// Where each object came from (a manifest file), for error messages.
    pub origins: BTreeMap<ObjectRef, PathBuf>,
    /// Input that could not be read or parsed, already named and explained.
    pub errors: Vec<SourceError>,
}

/// Bad input found by a source: the file (if any), the object (if known), the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceError {
    pub file: Option<PathBuf>,
    pub object: Option<ObjectRef>,
    pub reason: String,
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if let Some(obj) = &self.object {
            write!(f, "{obj}: ")?;
        }
        f.write_str(&self.reason)
    }
}

//! Kubernetes metadata: pods of this node and their owners.

pub mod meta;

pub use meta::{ContainerMeta, NoPods, Owner, PodLookup, PodMeta};

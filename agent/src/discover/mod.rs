//! Which processes to watch and what to call them.

pub mod cgroup;
pub mod container;
pub mod k8s;
pub mod resource;
pub mod select;

use std::sync::Arc;

use crate::model::Resource;

/// Gives the resource (service identity) of a watched process. Implementations cache: this is
/// called for every new connection.
pub trait ResourceLookup {
    fn resource_for(&mut self, pid: u32, cgroup_id: u64) -> Arc<Resource>;
}

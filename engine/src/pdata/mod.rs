//! Persistent data structures in the kernel's layout: b-trees and space maps. They know
//! nothing about thin devices.

pub mod btree;
pub mod space_map;

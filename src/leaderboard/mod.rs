//! Live leaderboards: pure ranking logic, its durable store, and the service that
//! publishes rankings to the hub.

pub mod demo;
pub mod friends;
pub mod policy;
pub mod ranking;
pub mod season;
pub mod service;
pub mod shared;
pub mod storage;
pub mod store;

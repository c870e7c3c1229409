//! The simulated hypervisor: grant tables, event channels and a xenstored, across processes.

pub mod evtchn;
pub mod gnttab;
pub mod xenstored;

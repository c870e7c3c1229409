//! Event channels over /dev/xen/evtchn.

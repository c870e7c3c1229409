//! Grant mapping and copying over /dev/xen/gntdev.

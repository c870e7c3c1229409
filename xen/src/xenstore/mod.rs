//! XenStore client: the wire protocol over the xenstored socket or /dev/xen/xenbus.

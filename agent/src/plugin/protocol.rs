//! The JSON bodies of Docker's remote network driver and IPAM driver calls, as
//! libnetwork (Docker 20.10) sends and reads them: `drivers/remote/api/api.go` and
//! `ipams/remote/api/api.go`. Field names are Go's (PascalCase, `NetworkID`, `V6`).
//!
//! Requests take unknown fields, missing fields and `null` maps or lists (Go encodes
//! a nil map as `null`). Responses leave out what Docker would read as a change:
//! it rolls an endpoint back when the driver echoes an address it supplied.

use std::collections::HashMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// Under this key of a network's `Options`, the `-o key=value` driver options.
pub const GENERIC_OPTIONS_KEY: &str = "com.docker.network.generic";
/// Present (true) in a network's `Options` for `docker network create --internal`.
pub const INTERNAL_KEY: &str = "com.docker.network.internal";
/// In a network's `Options`: `--ipv6` given or not.
pub const ENABLE_IPV6_KEY: &str = "com.docker.network.enable_ipv6";

/// [`StaticRoute::route_type`]: the route goes through [`StaticRoute::next_hop`].
pub const ROUTE_NEXT_HOP: i32 = 0;
/// [`StaticRoute::route_type`]: the destination is on the link itself.
pub const ROUTE_CONNECTED: i32 = 1;

/// `null` read as the empty value, as Go writes nil maps and slices.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn is_empty(s: &str) -> bool {
    s.is_empty()
}

// ---- IPAM driver ----

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct RequestPoolRequest {
    pub address_space: String,
    /// The pool asked for (`--subnet`), CIDR; empty for "any".
    pub pool: String,
    /// `--ip-range`, CIDR; empty when not given.
    pub sub_pool: String,
    #[serde(deserialize_with = "nullable")]
    pub options: HashMap<String, String>,
    #[serde(rename = "V6")]
    pub v6: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct RequestPoolResponse {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    /// CIDR.
    pub pool: String,
    #[serde(deserialize_with = "nullable")]
    pub data: HashMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReleasePoolRequest {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct RequestAddressRequest {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    /// The address asked for, without prefix; empty for "any".
    pub address: String,
    /// `com.docker.network.ipam.type` = `gateway` when Docker asks for the gateway.
    #[serde(deserialize_with = "nullable")]
    pub options: HashMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct RequestAddressResponse {
    /// CIDR: the address with its pool's prefix length.
    pub address: String,
    #[serde(deserialize_with = "nullable")]
    pub data: HashMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct ReleaseAddressRequest {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    pub address: String,
}

// ---- Network driver ----

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct CreateNetworkRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(deserialize_with = "nullable")]
    pub options: HashMap<String, Value>,
    #[serde(rename = "IPv4Data", deserialize_with = "nullable")]
    pub ipv4_data: Vec<IPAMData>,
    #[serde(rename = "IPv6Data", deserialize_with = "nullable")]
    pub ipv6_data: Vec<IPAMData>,
}

impl CreateNetworkRequest {
    /// The `-o key=value` options.
    pub fn generic_options(&self) -> HashMap<String, String> {
        generic_options(&self.options)
    }

    /// `--internal`.
    pub fn internal(&self) -> bool {
        option_flag(&self.options, INTERNAL_KEY).unwrap_or(false)
    }

    /// `--ipv6`, when Docker says.
    pub fn enable_ipv6(&self) -> Option<bool> {
        option_flag(&self.options, ENABLE_IPV6_KEY)
    }
}

/// The `-o key=value` options under [`GENERIC_OPTIONS_KEY`] of a network's, an
/// endpoint's or a join's `Options`. Docker sends strings; numbers and booleans a
/// client sent are taken as their text, anything else is left out.
pub fn generic_options(options: &HashMap<String, Value>) -> HashMap<String, String> {
    let Some(Value::Object(generic)) = options.get(GENERIC_OPTIONS_KEY) else {
        return HashMap::new();
    };
    generic
        .iter()
        .filter_map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Bool(_) | Value::Number(_) => v.to_string(),
                _ => return None,
            };
            Some((k.clone(), text))
        })
        .collect()
}

/// A boolean option, given as a JSON boolean (as Docker does) or as "true"/"false".
pub fn option_flag(options: &HashMap<String, Value>, key: &str) -> Option<bool> {
    match options.get(key)? {
        Value::Bool(b) => Some(*b),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// One address pool of a network, as the IPAM driver gave it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct IPAMData {
    pub address_space: String,
    /// CIDR.
    pub pool: String,
    /// CIDR (the gateway address with the pool's prefix length); may be absent.
    pub gateway: String,
    /// Name to CIDR (`--aux-address`).
    #[serde(deserialize_with = "nullable")]
    pub aux_addresses: HashMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeleteNetworkRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct CreateEndpointRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    /// What Docker already chose (the address from the IPAM driver, a MAC if given).
    pub interface: Option<EndpointInterface>,
    #[serde(deserialize_with = "nullable")]
    pub options: HashMap<String, Value>,
}

/// An endpoint's addresses; in a response, only what the driver chose and Docker
/// did not (an empty field is left out).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct EndpointInterface {
    /// CIDR.
    #[serde(skip_serializing_if = "is_empty")]
    pub address: String,
    /// CIDR.
    #[serde(rename = "AddressIPv6", skip_serializing_if = "is_empty")]
    pub address_ipv6: String,
    #[serde(skip_serializing_if = "is_empty")]
    pub mac_address: String,
}

/// `interface: None` answers "nothing to add": the usual answer, since Docker
/// supplies the address and rolls back if the driver sends it back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct CreateEndpointResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<EndpointInterface>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeleteEndpointRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EndpointInfoRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
}

/// Shown by `docker network inspect` / `docker inspect` as the endpoint's driver info.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct EndpointInfoResponse {
    #[serde(deserialize_with = "nullable")]
    pub value: HashMap<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct JoinRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    /// The container's network namespace path.
    pub sandbox_key: String,
    #[serde(deserialize_with = "nullable")]
    pub options: HashMap<String, Value>,
}

/// The interface Docker moves into the container: `src_name` on the host, renamed
/// `<dst_prefix><n>` (e.g. `eth1`) inside.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct InterfaceName {
    pub src_name: String,
    pub dst_prefix: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct JoinResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface_name: Option<InterfaceName>,
    /// Not read by Docker 20.10 (the MAC is settled at CreateEndpoint); sent only
    /// when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac_address: Option<String>,
    /// The default gateway's address, no prefix.
    #[serde(skip_serializing_if = "is_empty")]
    pub gateway: String,
    #[serde(rename = "GatewayIPv6", skip_serializing_if = "is_empty")]
    pub gateway_ipv6: String,
    #[serde(deserialize_with = "nullable")]
    pub static_routes: Vec<StaticRoute>,
    pub disable_gateway_service: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct StaticRoute {
    /// CIDR.
    pub destination: String,
    /// [`ROUTE_NEXT_HOP`] or [`ROUTE_CONNECTED`].
    pub route_type: i32,
    #[serde(skip_serializing_if = "is_empty")]
    pub next_hop: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LeaveRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
}

// ---- Answered by the server itself ----

/// `Plugin.Activate`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct ActivateResponse {
    pub implements: Vec<String>,
}

/// `NetworkDriver.GetCapabilities`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct NetworkCapabilities {
    pub scope: String,
    pub connectivity_scope: String,
}

/// `IpamDriver.GetCapabilities`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct IpamCapabilities {
    #[serde(rename = "RequiresMACAddress")]
    pub requires_mac_address: bool,
    pub requires_request_replay: bool,
}

/// `IpamDriver.GetDefaultAddressSpaces`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct AddressSpaces {
    pub local_default_address_space: String,
    pub global_default_address_space: String,
}

/// Any failed call, with a non-200 status: Docker's plugin client shows `Err`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct ErrorResponse {
    pub err: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decodes_docker_create_network() {
        // As libnetwork's remote driver sends it for
        // `docker network create -d netagent -o encrypted=true --subnet 10.1.0.0/16`.
        let body = r#"{"NetworkID":"9f2c1e","Options":{"com.docker.network.enable_ipv6":false,"com.docker.network.generic":{"encrypted":"true"}},"IPv4Data":[{"AddressSpace":"netagent","Pool":"10.1.0.0/16","Gateway":"10.1.0.1/16","AuxAddresses":null}],"IPv6Data":[]}"#;
        let r: CreateNetworkRequest = serde_json::from_str(body).unwrap();
        assert_eq!(r.network_id, "9f2c1e");
        assert_eq!(
            r.ipv4_data,
            vec![IPAMData {
                address_space: "netagent".into(),
                pool: "10.1.0.0/16".into(),
                gateway: "10.1.0.1/16".into(),
                aux_addresses: HashMap::new(),
            }]
        );
        assert!(r.ipv6_data.is_empty());
        assert_eq!(
            r.generic_options(),
            HashMap::from([("encrypted".to_owned(), "true".to_owned())])
        );
        assert_eq!(r.enable_ipv6(), Some(false));
        assert!(!r.internal());
    }

    #[test]
    fn tolerates_nulls_missing_and_unknown_fields() {
        let r: CreateNetworkRequest = serde_json::from_str(
            r#"{"NetworkID":"n","Options":null,"IPv4Data":null,"Future":1,"IPv6Data":[{"AddressSpace":"a","Pool":"fd00::/64"}]}"#,
        )
        .unwrap();
        assert!(r.options.is_empty() && r.ipv4_data.is_empty());
        assert_eq!(r.ipv6_data[0].gateway, "");
        assert!(r.generic_options().is_empty());
        assert_eq!(r.enable_ipv6(), None);

        let r: RequestPoolRequest =
            serde_json::from_str(r#"{"AddressSpace":"netagent","Options":null,"V6":true}"#)
                .unwrap();
        assert!(r.v6 && r.pool.is_empty() && r.options.is_empty());

        let r: CreateEndpointRequest = serde_json::from_str(
            r#"{"NetworkID":"n","EndpointID":"e","Interface":{"Address":"10.1.0.2/16","AddressIPv6":"","MacAddress":""},"Options":{"com.docker.network.endpoint.exposedports":null,"com.docker.network.portmap":null}}"#,
        )
        .unwrap();
        assert_eq!(r.interface.unwrap().address, "10.1.0.2/16");

        let r: JoinRequest = serde_json::from_str(
            r#"{"NetworkID":"n","EndpointID":"e","SandboxKey":"/var/run/docker/netns/abc","Options":{"com.docker.network.internal":true}}"#,
        )
        .unwrap();
        assert_eq!(r.sandbox_key, "/var/run/docker/netns/abc");
        assert_eq!(option_flag(&r.options, INTERNAL_KEY), Some(true));
    }

    #[test]
    fn join_response_leaves_out_what_is_unset() {
        let bare = serde_json::to_value(JoinResponse::default()).unwrap();
        assert_eq!(
            bare,
            json!({"StaticRoutes": [], "DisableGatewayService": false})
        );
        let full = JoinResponse {
            interface_name: Some(InterfaceName {
                src_name: "nav1234".into(),
                dst_prefix: "eth".into(),
            }),
            mac_address: None,
            gateway: "10.1.0.1".into(),
            gateway_ipv6: String::new(),
            static_routes: vec![
                StaticRoute {
                    destination: "10.2.0.0/16".into(),
                    route_type: ROUTE_CONNECTED,
                    next_hop: String::new(),
                },
                StaticRoute {
                    destination: "10.3.0.0/16".into(),
                    route_type: ROUTE_NEXT_HOP,
                    next_hop: "10.1.0.254".into(),
                },
            ],
            disable_gateway_service: true,
        };
        assert_eq!(
            serde_json::to_value(full).unwrap(),
            json!({
                "InterfaceName": {"SrcName": "nav1234", "DstPrefix": "eth"},
                "Gateway": "10.1.0.1",
                "StaticRoutes": [
                    {"Destination": "10.2.0.0/16", "RouteType": 1},
                    {"Destination": "10.3.0.0/16", "RouteType": 0, "NextHop": "10.1.0.254"}
                ],
                "DisableGatewayService": true
            })
        );
    }

    #[test]
    fn responses_use_go_field_names() {
        assert_eq!(
            serde_json::to_value(CreateEndpointResponse::default()).unwrap(),
            json!({})
        );
        let with_mac = CreateEndpointResponse {
            interface: Some(EndpointInterface {
                mac_address: "02:42:0a:01:00:02".into(),
                ..Default::default()
            }),
        };
        assert_eq!(
            serde_json::to_value(with_mac).unwrap(),
            json!({"Interface": {"MacAddress": "02:42:0a:01:00:02"}})
        );
        let v6 = EndpointInterface {
            address_ipv6: "fd00::2/64".into(),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(v6).unwrap(),
            json!({"AddressIPv6": "fd00::2/64"})
        );
        assert_eq!(
            serde_json::to_value(IpamCapabilities::default()).unwrap(),
            json!({"RequiresMACAddress": false, "RequiresRequestReplay": false})
        );
        assert_eq!(
            serde_json::to_value(RequestAddressResponse {
                address: "10.1.0.2/16".into(),
                data: HashMap::new()
            })
            .unwrap(),
            json!({"Address": "10.1.0.2/16", "Data": {}})
        );
        let r: ReleaseAddressRequest =
            serde_json::from_str(r#"{"PoolID":"p","Address":"10.1.0.2"}"#).unwrap();
        assert_eq!((r.pool_id.as_str(), r.address.as_str()), ("p", "10.1.0.2"));
    }
}

//! Topic names (see the table in the crate documentation).

/// Every topic starts with this.
pub const PREFIX: &str = "tributary";

/// What the authority subscribes to.
pub const REQUEST_FILTER: &str = "tributary/onboarding/request/+";
pub const HEARTBEAT_FILTER: &str = "tributary/device/+/heartbeat";
pub const CONFIG_ACK_FILTER: &str = "tributary/device/+/config/ack";

pub fn request(device_id: &str) -> String {
    format!("{PREFIX}/onboarding/request/{device_id}")
}

pub fn response(device_id: &str) -> String {
    format!("{PREFIX}/onboarding/response/{device_id}")
}

pub fn heartbeat(device_id: &str) -> String {
    format!("{PREFIX}/device/{device_id}/heartbeat")
}

pub fn config(device_id: &str) -> String {
    format!("{PREFIX}/device/{device_id}/config")
}

pub fn config_ack(device_id: &str) -> String {
    format!("{PREFIX}/device/{device_id}/config/ack")
}

/// What a received topic is, with the device id it names (not yet validated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topic<'a> {
    Request(&'a str),
    Response(&'a str),
    Heartbeat(&'a str),
    Config(&'a str),
    ConfigAck(&'a str),
}

/// Classifies `topic`; `None` for anything outside the layout.
pub fn parse(topic: &str) -> Option<Topic<'_>> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix('/')?;
    let parts: Vec<&str> = rest.splitn(5, '/').collect();
    match parts.as_slice() {
        ["onboarding", "request", id] => Some(Topic::Request(id)),
        ["onboarding", "response", id] => Some(Topic::Response(id)),
        ["device", id, "heartbeat"] => Some(Topic::Heartbeat(id)),
        ["device", id, "config"] => Some(Topic::Config(id)),
        ["device", id, "config", "ack"] => Some(Topic::ConfigAck(id)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(topic: &str, expected: Option<Topic<'_>>) {
        assert_eq!(parse(topic), expected, "{topic}");
    }

    #[test]
    fn topics_round_trip_and_strangers_are_refused() {
        check(&request("a-1"), Some(Topic::Request("a-1")));
        check(&response("a-1"), Some(Topic::Response("a-1")));
        check(&heartbeat("a-1"), Some(Topic::Heartbeat("a-1")));
        check(&config("a-1"), Some(Topic::Config("a-1")));
        check(&config_ack("a-1"), Some(Topic::ConfigAck("a-1")));
        check("tributary/device/a/b/heartbeat", None);
        check("other/onboarding/request/a", None);
        check("tributary/onboarding/request/a/b", None);
    }
}

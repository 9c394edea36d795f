//! MQTT packet framing and the rewrites the front makes (to be written).

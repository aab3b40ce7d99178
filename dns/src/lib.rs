//! The embedded DNS server every attached container asks at 127.0.0.11 (issue 3).
//! Nothing here yet: the datapath comes first.

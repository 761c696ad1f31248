//! lb-client: the thin client library (see issue: lb-client and greeter).

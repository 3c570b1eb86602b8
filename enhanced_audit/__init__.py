"""The enhanced service's parts, by concern; the public API is the top-level enhanced_audit_log_service."""

"""sovpack/oci"""

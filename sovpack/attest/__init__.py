"""sovpack/attest"""

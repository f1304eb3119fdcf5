"""sovpack/source"""

"""Helpers shared by the test suites: real service processes and an MQTT subscriber."""

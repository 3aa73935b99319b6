"""Clients of Cadence services, shared by the services that call each other."""

from cadence.clients.broker import BrokerClient as BrokerClient

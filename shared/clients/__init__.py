"""Clients of Cadence services, shared by the services that call each other."""

from cadence.clients.broker import BrokerClient as BrokerClient
from cadence.clients.reward import AsyncRewardClient as AsyncRewardClient
from cadence.clients.reward import RewardClient as RewardClient
from cadence.clients.reward import ScoreItem as ScoreItem
from cadence.clients.reward import ScoreResult as ScoreResult

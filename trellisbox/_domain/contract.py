"""The gRPC services of the contract, named once, from the proto descriptors."""

from __future__ import annotations

from trellisbox.v1 import gateway_pb2, refiner_pb2, trellis_pb2

GATEWAY_SERVICE: str = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
REFINER_SERVICE: str = refiner_pb2.DESCRIPTOR.services_by_name["RefinerService"].full_name
TRELLIS_SERVICE: str = trellis_pb2.DESCRIPTOR.services_by_name["TrellisService"].full_name

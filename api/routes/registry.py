"""The signed-session profile's registry (docs/API.md, "Products and devices"): products
(productKey, productSecret) and their devices (deviceKey, deviceSecret), managed with the API
key. A secret is returned once, by the call that creates it; listings never show one.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from api.deps import require_api_key
from api.errors import (
    DeviceKeyExists,
    ProductExists,
    ProductHasDevices,
    ProductNotFound,
    RegisteredDeviceNotFound,
    StoreUnavailable,
    error_responses,
)
from api.presence import PresenceDep
from api.safe_json import SafeJsonRoute
from stores import registry as reg
from stores.presence import Presence
from stores.registry import (
    DEVICE_KEY_PATTERN,
    PRODUCT_KEY_PATTERN,
    Product,
    RegisteredDevice,
    Registry,
)

router = APIRouter(
    tags=["registry"], route_class=SafeJsonRoute, dependencies=[Depends(require_api_key)]
)

PRODUCT_KEY_LENGTH = 8
_ALPHANUMERIC = string.ascii_letters + string.digits
SECRET_BYTES = 16
"""A product's or device's secret: 16 random bytes as 32 hex characters (128 bits: a sign
cannot be forged by guessing it)."""


async def get_registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


RegistryDep = Annotated[Registry, Depends(get_registry)]
ProductKey = Annotated[str, Path(pattern=PRODUCT_KEY_PATTERN, description="the productKey")]
DeviceKey = Annotated[str, Path(pattern=DEVICE_KEY_PATTERN, description="the deviceKey")]


@contextmanager
def registry_errors() -> Iterator[None]:
    """The store's refusals as the API's errors."""
    try:
        yield
    except reg.ProductNotFound as exc:
        raise ProductNotFound() from exc
    except reg.ProductExists as exc:
        raise ProductExists() from exc
    except reg.ProductHasDevices as exc:
        raise ProductHasDevices() from exc
    except reg.DeviceNotRegistered as exc:
        raise RegisteredDeviceNotFound() from exc
    except reg.DeviceKeyTaken as exc:
        raise DeviceKeyExists() from exc
    except reg.RegistryUnavailable as exc:
        raise StoreUnavailable(str(exc)) from exc


def new_secret() -> str:
    return secrets.token_hex(SECRET_BYTES)


def _iso(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


class PresenceOut(BaseModel):
    """Whether a device is online (docs/API.md, "Presence"); times in UTC."""

    device: str
    online: bool
    last_seen: datetime | None = Field(description="the last message that counted")
    expires_at: datetime | None = Field(
        description="when it goes offline unless it speaks again; null when offline"
    )

    @classmethod
    def of(cls, presence: Presence) -> PresenceOut:
        return cls(
            device=presence.device,
            online=presence.online,
            last_seen=_iso(presence.last_seen),
            expires_at=_iso(presence.expires_at),
        )


class ProductIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    product_key: str | None = Field(
        default=None,
        alias="productKey",
        pattern=PRODUCT_KEY_PATTERN,
        description=f"chosen by the caller, or {PRODUCT_KEY_LENGTH} random letters and digits",
    )
    name: str | None = Field(default=None, max_length=128)


class ProductOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    product_key: str = Field(alias="productKey")
    name: str | None
    created_at: datetime = Field(alias="createdAt")


class ProductCreated(ProductOut):
    product_secret: str = Field(alias="productSecret", description="shown this once")


class DeviceIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    device_key: str = Field(alias="deviceKey", pattern=DEVICE_KEY_PATTERN)


class DeviceOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    product_key: str = Field(alias="productKey")
    device_key: str = Field(alias="deviceKey")
    device_id: str = Field(
        alias="deviceId", description="`<productKey>:<deviceKey>`: its id in presence and MQTT"
    )
    created_at: datetime = Field(alias="createdAt")


class DeviceListed(DeviceOut):
    presence: PresenceOut


class DeviceCreated(DeviceOut):
    device_secret: str = Field(alias="deviceSecret", description="shown this once")


def _product_out(product: Product) -> dict[str, object]:
    return {
        "productKey": product.product_key,
        "name": product.name,
        "createdAt": datetime.fromtimestamp(product.created_at, UTC),
    }


def _device_out(device: RegisteredDevice) -> dict[str, object]:
    return {
        "productKey": device.product_key,
        "deviceKey": device.device_key,
        "deviceId": device.id,
        "createdAt": datetime.fromtimestamp(device.created_at, UTC),
    }


@router.post(
    "/products",
    status_code=201,
    response_model=ProductCreated,
    summary="Create a product; its productSecret is shown once",
    responses=error_responses(ProductExists, StoreUnavailable),
)
async def create_product(
    body: ProductIn, registry: RegistryDep, presence: PresenceDep
) -> ProductCreated:
    key = body.product_key or "".join(
        secrets.choice(_ALPHANUMERIC) for _ in range(PRODUCT_KEY_LENGTH)
    )
    product = Product(key, new_secret(), body.name, presence.clock())
    with registry_errors():
        await registry.create_product(product)
    return ProductCreated.model_validate(
        {**_product_out(product), "productSecret": product.product_secret}
    )


@router.get("/products", response_model=list[ProductOut], summary="List the products")
async def list_products(registry: RegistryDep) -> list[ProductOut]:
    with registry_errors():
        products = await registry.list_products()
    return [ProductOut.model_validate(_product_out(p)) for p in products]


@router.delete(
    "/products/{product_key}",
    status_code=204,
    summary="Delete a product that has no devices",
    responses=error_responses(ProductNotFound, ProductHasDevices, StoreUnavailable),
)
async def delete_product(product_key: ProductKey, registry: RegistryDep) -> Response:
    with registry_errors():
        await registry.delete_product(product_key)
    return Response(status_code=204)


@router.post(
    "/products/{product_key}/devices",
    status_code=201,
    response_model=DeviceCreated,
    summary="Register a device of a product; its deviceSecret is shown once",
    responses=error_responses(ProductNotFound, DeviceKeyExists, StoreUnavailable),
)
async def create_device(
    product_key: ProductKey, body: DeviceIn, registry: RegistryDep, presence: PresenceDep
) -> DeviceCreated:
    device = RegisteredDevice(product_key, body.device_key, new_secret(), presence.clock())
    with registry_errors():
        await registry.create_device(device)
    return DeviceCreated.model_validate(
        {**_device_out(device), "deviceSecret": device.device_secret}
    )


@router.get(
    "/products/{product_key}/devices",
    response_model=list[DeviceListed],
    summary="List a product's devices, with their presence",
    responses=error_responses(ProductNotFound, StoreUnavailable),
)
async def list_devices(
    product_key: ProductKey, registry: RegistryDep, presence: PresenceDep
) -> list[DeviceListed]:
    with registry_errors():
        devices = await registry.list_devices(product_key)
    states = await presence.get_many([d.id for d in devices])
    return [
        DeviceListed.model_validate({**_device_out(d), "presence": PresenceOut.of(p)})
        for d, p in zip(devices, states, strict=True)
    ]


@router.get(
    "/products/{product_key}/devices/{device_key}",
    response_model=DeviceListed,
    summary="One device, with its presence (never its secret)",
    responses=error_responses(RegisteredDeviceNotFound, StoreUnavailable),
)
async def get_device(
    product_key: ProductKey, device_key: DeviceKey, registry: RegistryDep, presence: PresenceDep
) -> DeviceListed:
    with registry_errors():
        device = await registry.get_device(product_key, device_key)
    if device is None:
        raise RegisteredDeviceNotFound()
    state = await presence.get(device.id)
    return DeviceListed.model_validate({**_device_out(device), "presence": PresenceOut.of(state)})


@router.delete(
    "/products/{product_key}/devices/{device_key}",
    status_code=204,
    summary="Delete a device: its session ends, its presence is forgotten",
    responses=error_responses(RegisteredDeviceNotFound, StoreUnavailable),
)
async def delete_device(
    product_key: ProductKey, device_key: DeviceKey, registry: RegistryDep, presence: PresenceDep
) -> Response:
    with registry_errors():
        await registry.delete_device(product_key, device_key)
    await presence.forget(reg.device_id(product_key, device_key))
    return Response(status_code=204)

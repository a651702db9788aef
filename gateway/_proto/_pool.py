"""The private descriptor pool that every generated module here registers into."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()

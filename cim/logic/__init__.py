"""The logic service (design: 逻辑服务器): the product behind the chat.

Accounts and profiles (``accounts``), binding devices such as a child's watch to the
people who look after them (``bindings``), SOS alarms (``sos``), geofences and
positions (``fences``), and posts that collect likes (``posts``), built together by
``features``. They take plain values, refuse with ``errors`` and import no HTTP;
``notices`` is how they tell people things: as IM system messages, so every
notification is stored, deduplicated and ordered like any message. ``http`` declares
their endpoints and OpenAPI document; ``cim.services.logic`` puts the service in the
daemon.
"""

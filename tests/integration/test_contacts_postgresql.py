"""The contact rules, group consent and the 0007 migration again, on PostgreSQL.

The SQLite runs are tests/unit/test_contacts*.py and tests/unit/test_group_invites.py;
each class here is one of theirs on a scratch PostgreSQL database (see
tests/integration/test_storage.py), where the rules' single statement, its row locks
and the migration's SQL meet another engine.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from cim.storage.database import upgrade
from tests.integration.test_storage import scratch_postgresql_url
from tests.unit import test_contacts, test_contacts_node, test_group_invites


def upgraded_postgresql(test: TestCase) -> str:
    url = scratch_postgresql_url(test)
    upgrade(url)
    return url


class ContactRequestTests(test_contacts.ContactRequestTests):
    def database_url(self) -> str:
        return upgraded_postgresql(self)


class DeviceContactTests(test_contacts.DeviceContactTests):
    def database_url(self) -> str:
        return upgraded_postgresql(self)


class BlockTests(test_contacts.BlockTests):
    def database_url(self) -> str:
        return upgraded_postgresql(self)


class RuleTests(test_contacts.RuleTests):
    def database_url(self) -> str:
        return upgraded_postgresql(self)


class AccountDeletionTests(test_contacts.AccountDeletionTests):
    def database_url(self) -> str:
        return upgraded_postgresql(self)


class MigrationTests(test_contacts.MigrationTests):
    def database_url(self) -> str:
        return scratch_postgresql_url(self)  # made at 0006 by the test itself


class MessageConsentTests(test_contacts_node.MessageConsentTests):
    def database_url(self) -> str:
        return upgraded_postgresql(self)


class PresenceTests(test_contacts_node.PresenceTests):
    def database_url(self) -> str:
        return upgraded_postgresql(self)


class DeviceGroupTests(test_group_invites.DeviceTests):
    def database_url(self) -> str:
        return upgraded_postgresql(self)


class InvitationTests(test_group_invites.InvitationTests):
    def database_url(self) -> str:
        return upgraded_postgresql(self)


class GroupRequestTests(test_group_invites.GroupRequestTests):
    def database_url(self) -> str:
        return upgraded_postgresql(self)

"""The DynamoDB ledger adapter (split follows): see `ledger.py`."""

from receiver.ledger.dynamodb.ledger import DynamoLedger, Item, decode, encode, table_definition

__all__ = ["DynamoLedger", "Item", "decode", "encode", "table_definition"]

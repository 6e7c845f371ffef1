# Prepares a fresh moto server for the test bed, then turns its request checking on: an IAM user
# whose access key may do anything in S3, and a bucket. Prints the user's key as JSON. (With its
# checks on, moto refuses unsigned requests whatever the bucket policy says, so the anonymous view
# Nix reads is a signing gateway in s3.rs, not a public-read policy.)
# Run by crates/testbed with moto's own Python: python moto_setup.py ENDPOINT BUCKET REGION
import json
import sys
import urllib.request

import boto3

endpoint, bucket, region = sys.argv[1:4]
# Until reset-auth below, moto checks no signature: any key sets it up.
setup = dict(
    endpoint_url=endpoint,
    region_name=region,
    aws_access_key_id="setup",
    aws_secret_access_key="setup",
)
iam = boto3.client("iam", **setup)
iam.create_user(UserName="nixpush")
iam.put_user_policy(
    UserName="nixpush",
    PolicyName="s3",
    PolicyDocument=json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
    ),
)
key = iam.create_access_key(UserName="nixpush")["AccessKey"]
s3 = boto3.client("s3", **setup)
s3.create_bucket(Bucket=bucket)
# From now on every request is authenticated (SigV4 checked) and authorized against IAM.
urllib.request.urlopen(
    urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=b"0",
        method="POST",
        # A form content type would make moto's Flask read the body as a form, leaving it empty.
        headers={"Content-Type": "text/plain"},
    )
)
print(json.dumps({"access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"]}))

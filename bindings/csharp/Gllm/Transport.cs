// Keeps one ZMTP connection to the runtime alive on two background threads, so the game thread never
// touches a socket:
//   the I/O thread connects (retrying with back-off), reads frames, answers PINGs, sends its own PING when
//     the line is quiet, and declares the runtime dead when nothing arrives for HeartbeatTimeout;
//   the writer thread sends queued messages as soon as there is a connection.
// Messages sent while no connection is up wait in the queue (those of a request that times out meanwhile are
// withdrawn, so a restarted runtime never gets them late). When an established connection is lost, the
// owner (LlmClient) drops the queue and fails its open requests, in its Disconnected callback: the runtime
// cancels a vanished client's requests, so none of them can be resumed on the next connection.
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Threading;

namespace Gllm
{
    internal sealed class Transport
    {
        /// <summary>How often the I/O thread wakes without traffic: the resolution of every timeout.</summary>
        public const int TickMs = 50;

        // Called on the I/O thread.
        public Action Connected;
        public Action<string> Disconnected;
        public Action<byte[]> Message;
        public Action<string> Problem;
        public Action Tick;

        readonly string host;
        readonly int port;
        readonly LlmClientOptions options;
        readonly object gate = new object();
        readonly Queue<KeyValuePair<long, byte[]>> outbox = new Queue<KeyValuePair<long, byte[]>>();  // (request id, frame)
        readonly ManualResetEvent stopEvent = new ManualResetEvent(false);
        readonly Stopwatch clock = Stopwatch.StartNew();
        ZmtpSocket current;
        bool stopped, started;

        public Transport(string endpoint, LlmClientOptions options)
        {
            ParseEndpoint(endpoint, out host, out port);
            this.options = options;
            IPAddress literal;
            bool loopback = host == "localhost" || (IPAddress.TryParse(host, out literal) && IPAddress.IsLoopback(literal));
            if (!loopback && !options.AllowNonLoopback)
                throw new ArgumentException("'" + host + "' is not a loopback address: the protocol has no encryption " +
                                            "(no CurveZMQ), so the client talks only to a runtime on this machine " +
                                            "unless LlmClientOptions.AllowNonLoopback is set");
        }

        /// <summary>Accepts tcp://HOST:PORT (HOST may be [IPv6]), as gllm serve's --bind takes it.</summary>
        public static void ParseEndpoint(string endpoint, out string host, out int port)
        {
            const string scheme = "tcp://";
            int colon = endpoint == null ? -1 : endpoint.LastIndexOf(':');
            if (endpoint == null || !endpoint.StartsWith(scheme) || colon < scheme.Length ||
                !int.TryParse(endpoint.Substring(colon + 1), out port) || port < 1 || port > 65535)
                throw new ArgumentException("endpoint must look like tcp://127.0.0.1:5555, got '" + endpoint + "'");
            host = endpoint.Substring(scheme.Length, colon - scheme.Length).Trim('[', ']');
        }

        public void Start()
        {
            lock (gate)
            {
                if (started || stopped) return;
                started = true;
            }
            new Thread(RunIo) { IsBackground = true, Name = "gllm-io" }.Start();
            new Thread(RunWriter) { IsBackground = true, Name = "gllm-writer" }.Start();
        }

        /// <summary>Queue one message (a msgpack body) of request <paramref name="id"/>; it goes out as one frame
        /// once connected.</summary>
        public void Send(long id, byte[] body)
        {
            byte[] frame = Zmtp.MessageFrame(body);
            lock (gate)
            {
                if (stopped) return;
                outbox.Enqueue(new KeyValuePair<long, byte[]>(id, frame));
                Monitor.PulseAll(gate);
            }
        }

        /// <summary>Takes back the queued messages of request <paramref name="id"/>; true if any had not gone out,
        /// so that a request given up on while the runtime was unreachable is never sent to it later.</summary>
        public bool Withdraw(long id)
        {
            lock (gate)
            {
                int before = outbox.Count;
                var kept = new List<KeyValuePair<long, byte[]>>(outbox);
                kept.RemoveAll(m => m.Key == id);
                outbox.Clear();
                foreach (KeyValuePair<long, byte[]> m in kept) outbox.Enqueue(m);
                return outbox.Count < before;
            }
        }

        public void DropQueued()
        {
            lock (gate) outbox.Clear();
        }

        /// <summary>Ends both threads and closes the socket. Returns at once; callbacks stop soon after.</summary>
        public void Stop()
        {
            ZmtpSocket conn;
            lock (gate)
            {
                stopped = true;
                outbox.Clear();
                conn = current;
                Monitor.PulseAll(gate);
            }
            stopEvent.Set();
            if (conn != null) conn.Close();
        }

        bool IsStopped
        {
            get { lock (gate) return stopped; }
        }

        // ------------------------------------------------------------------------------- the I/O thread
        void RunIo()
        {
            TimeSpan backoff = options.ReconnectMin;
            while (!IsStopped)
            {
                ZmtpSocket conn;
                try
                {
                    conn = Open();
                }
                catch (Exception e)
                {
                    Report("cannot connect to tcp://" + host + ":" + port + ": " + e.Message);
                    Wait(backoff);
                    backoff = TimeSpan.FromTicks(Math.Min(backoff.Ticks * 2, options.ReconnectMax.Ticks));
                    continue;
                }
                lock (gate)
                {
                    if (stopped)
                    {
                        conn.Close();
                        return;
                    }
                    current = conn;
                    Monitor.PulseAll(gate);
                }
                backoff = options.ReconnectMin;
                Connected();
                string reason = Serve(conn);
                lock (gate) current = null;
                conn.Close();
                if (IsStopped) return;
                Disconnected(reason);
                Wait(backoff);
            }
        }

        ZmtpSocket Open()
        {
            Exception last = null;
            foreach (IPAddress address in Dns.GetHostAddresses(host))
            {
                if (!IPAddress.IsLoopback(address) && !options.AllowNonLoopback) continue;
                try
                {
                    return ZmtpSocket.Open(new IPEndPoint(address, port), options.ConnectTimeout, options.HandshakeTimeout, options.MaxMessageBytes);
                }
                catch (Exception e) when (e is SocketException || e is TimeoutException)
                {
                    last = e;  // try the next address (localhost may be ::1 and 127.0.0.1)
                }
            }
            throw last ?? new SocketException((int)SocketError.HostNotFound);
        }

        /// <summary>Reads until the connection fails; returns why.</summary>
        string Serve(ZmtpSocket conn)
        {
            long lastReceived = clock.ElapsedMilliseconds, lastPing = lastReceived, lastTick = 0;
            var parts = new List<byte[]>();
            long partBytes = 0;
            while (!IsStopped)
            {
                try
                {
                    if (conn.WaitReadable(TickMs))
                    {
                        conn.Receive();
                        lastReceived = clock.ElapsedMilliseconds;
                        ZmtpFrame frame;
                        while (conn.TryTakeFrame(out frame))
                        {
                            if (frame.IsCommand)
                            {
                                OnCommand(conn, frame);
                                continue;
                            }
                            parts.Add(frame.Body);
                            partBytes += frame.Body.Length;
                            if (partBytes > options.MaxMessageBytes) throw new ZmtpException("a multi-frame message over the size limit");
                            if (frame.More) continue;
                            if (parts.Count == 1) Message(parts[0]);
                            else Report("dropped a message of " + parts.Count + " frames: protocol v1 sends one frame per message");
                            parts.Clear();
                            partBytes = 0;
                        }
                    }
                    else
                    {
                        long quiet = clock.ElapsedMilliseconds - lastReceived;
                        if (quiet > options.HeartbeatTimeout.TotalMilliseconds)
                            return "no sign of life from the runtime for " + quiet / 1000.0 + " s";
                        if (quiet >= options.HeartbeatInterval.TotalMilliseconds &&
                            clock.ElapsedMilliseconds - lastPing >= options.HeartbeatInterval.TotalMilliseconds)
                        {
                            conn.Send(Zmtp.CommandFrame("PING", Zmtp.PingData(options.HeartbeatTimeout)));
                            lastPing = clock.ElapsedMilliseconds;
                        }
                    }
                }
                catch (Exception e)  // socket errors, a closed socket, ZMTP violations; anything else resets too
                {
                    return e.Message;
                }
                if (clock.ElapsedMilliseconds - lastTick >= TickMs)
                {
                    lastTick = clock.ElapsedMilliseconds;
                    Tick();
                }
            }
            return "stopped";
        }

        void OnCommand(ZmtpSocket conn, ZmtpFrame frame)
        {
            byte[] data;
            string name = Zmtp.CommandName(frame.Body, out data);
            switch (name)
            {
                case "PING":
                    conn.Send(Zmtp.CommandFrame("PONG", Zmtp.PongData(data)));
                    break;
                case "PONG":
                    break;  // any traffic counts as a sign of life; nothing else to do
                case "ERROR":
                    throw new ZmtpException("the runtime sent ERROR: " + ZmtpSocket.ErrorReason(data));
                case "READY":
                    throw new ZmtpException("the runtime sent a second READY");
                default:
                    break;  // commands of other socket types or later versions do not concern a DEALER
            }
        }

        /// <summary>Waits out a back-off, still ticking (request timeouts run while disconnected too).</summary>
        void Wait(TimeSpan delay)
        {
            long until = clock.ElapsedMilliseconds + (long)delay.TotalMilliseconds;
            while (!IsStopped)
            {
                Tick();
                long left = until - clock.ElapsedMilliseconds;
                if (left <= 0) return;
                stopEvent.WaitOne((int)Math.Min(left, TickMs));
            }
        }

        void Report(string problem)
        {
            if (Problem != null) Problem(problem);
        }

        // ---------------------------------------------------------------------------- the writer thread
        void RunWriter()
        {
            while (true)
            {
                byte[] frame;
                ZmtpSocket conn;
                lock (gate)
                {
                    while (!stopped && (current == null || outbox.Count == 0)) Monitor.Wait(gate);
                    if (stopped) return;
                    conn = current;
                    frame = outbox.Dequeue().Value;
                }
                try
                {
                    conn.Send(frame);
                }
                catch (Exception)
                {
                    conn.Close();  // the I/O thread sees the closed socket, reports the disconnect and reconnects
                }
            }
        }
    }
}
